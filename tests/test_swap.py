"""pyops.swap / unswap on real-looking models: same results as torch.nn, and the rest of PyTorch still works."""
import copy
import io
import os
import pickle
import tempfile

import pytest
import torch

import pyops
from conftest import BACKEND_CASES
from models import MODELS, TinyResNet, TinyUNet

TORCH_LAYERS = (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.MaxPool2d, torch.nn.AvgPool2d,
                torch.nn.BatchNorm2d, torch.nn.SyncBatchNorm, torch.nn.Dropout, torch.nn.Sigmoid)


def _types(model):
    return [type(m) for m in model.modules()]


def _randomise_bn(model):
    """Non-trivial BN parameters and running statistics, so a swap that loses them shows."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def test_swap_replaces_exact_layers_in_place_and_unswap_restores():
    torch.manual_seed(0)
    model = TinyUNet()
    before = {name: (type(m), m) for name, m in model.named_modules()}
    params = {name: p for name, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook_calls = []
    model.enc1[0].register_forward_hook(lambda *a: hook_calls.append(1))
    out = pyops.swap(model)
    assert out is model
    for name, m in model.named_modules():
        old_type, old_obj = before[name]
        assert m is old_obj  # same objects, same place
        if old_type in TORCH_LAYERS:
            assert type(m).__module__ == "pyops.nn" and isinstance(m, old_type)
        else:
            assert type(m) is old_type
    assert all(p is params[n] for n, p in model.named_parameters())  # the optimizer's Parameters
    assert model.pyops_swap_counts == {"Conv2d": 6, "ConvTranspose2d": 2, "MaxPool2d": 1, "BatchNorm2d": 5,
                                       "Dropout": 1, "Sigmoid": 1}
    model(torch.randn(1, 3, 8, 8)).sum().backward()
    opt.step()
    assert hook_calls == [1]
    assert pyops.swap(model).pyops_swap_counts == {}  # already swapped: a no-op
    pyops.unswap(model)
    assert [type(m) for _, m in model.named_modules()] == [t for t, _ in before.values()]
    assert not hasattr(model, "pyops_swap_counts")


def test_include_exclude_and_subclasses():
    class MyConv(torch.nn.Conv2d):  # a user's subclass may override more than forward: left alone
        pass

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), MyConv(4, 4, 1), torch.nn.BatchNorm2d(4),
                                torch.nn.Dropout(), torch.nn.Sigmoid())
    pyops.swap(model, include=[torch.nn.Conv2d, torch.nn.BatchNorm2d], exclude=pyops.nn.BatchNorm2d)
    assert [type(m) for m in model] == [pyops.nn.Conv2d, MyConv, torch.nn.BatchNorm2d, torch.nn.Dropout,
                                        torch.nn.Sigmoid]
    with pytest.raises(ValueError, match="include"):
        pyops.swap(model, include=[torch.nn.Linear])
    with pytest.raises(TypeError):
        pyops.swap("not a model")


def test_swap_verbose_lists_layers(capsys):
    pyops.swap(torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1), torch.nn.Sigmoid()), verbose=True)
    out = capsys.readouterr().out
    assert "0: torch.nn.modules.conv.Conv2d -> pyops.nn.Conv2d" in out and "replaced 1 Conv2d, 1 Sigmoid" in out


def _outputs_and_grads(model, x):
    x = x.detach().clone().requires_grad_()
    y = model(x)
    y.backward(torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape))
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return y.detach(), x.grad, grads


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("train", [False, True])
def test_swapped_model_matches_torch_in_float64(backend_device, name, train):
    torch.manual_seed(0)
    theirs = MODELS[name]().double()
    _randomise_bn(theirs)
    ours = pyops.swap(copy.deepcopy(theirs)).to(backend_device)
    for m in (theirs, ours):
        m.train(train)
        for d in m.modules():
            if isinstance(d, torch.nn.Dropout):
                d.p = 0.0  # training mode without randomness
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)  # small: the Triton interpreter runs it too
    y_ref, gx_ref, g_ref = _outputs_and_grads(theirs, x)
    y, gx, g = _outputs_and_grads(ours, x.to(backend_device))
    tol = {"atol": 1e-9, "rtol": 1e-9}
    torch.testing.assert_close(y.cpu(), y_ref, **tol)
    torch.testing.assert_close(gx.cpu(), gx_ref, **tol)
    for n in g_ref:
        torch.testing.assert_close(g[n].cpu(), g_ref[n], **tol, msg=n)
    for (n, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        torch.testing.assert_close(a.cpu(), b, **tol, msg=n)  # running statistics too


def test_deepcopy_pickle_save_and_torch_checkpoints():
    torch.manual_seed(0)
    plain = TinyResNet()
    _randomise_bn(plain)
    swapped = pyops.swap(TinyResNet())
    swapped.load_state_dict(plain.state_dict())  # a torch checkpoint loads as is
    plain.eval()
    swapped.eval()
    x = torch.randn(2, 3, 16, 16)
    expected = plain(x)
    torch.testing.assert_close(swapped(x), expected)
    buf = io.BytesIO()
    torch.save(swapped, buf)
    buf.seek(0)
    for clone in (copy.deepcopy(swapped), pickle.loads(pickle.dumps(swapped)),
                  torch.load(buf, weights_only=False)):
        assert type(clone.stem[0]) is pyops.nn.Conv2d and type(clone.stem[1]) is pyops.nn.BatchNorm2d
        torch.testing.assert_close(clone(x), expected)
    # and back to plain torch for sharing: a model without pyops in it
    restored = pyops.unswap(copy.deepcopy(swapped))
    assert not any(type(m).__module__.startswith("pyops") for m in restored.modules())
    torch.testing.assert_close(restored(x), expected)


def test_channels_last_model_stays_channels_last(backend_device):
    torch.manual_seed(0)
    model = pyops.swap(torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 8, 3, groups=8), torch.nn.AvgPool2d(2, ceil_mode=True), torch.nn.Dropout(0.1),
        torch.nn.ConvTranspose2d(8, 4, 2, stride=2), torch.nn.Sigmoid())).to(backend_device)
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 12, 12, device=backend_device).contiguous(memory_format=torch.channels_last)
    h = x
    for layer in model:
        h = layer(h)
        assert h.is_contiguous(memory_format=torch.channels_last), type(layer).__name__


def test_compiled_swapped_model_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = pyops.swap(TinyResNet())
    _randomise_bn(model)
    model.head[0].p = 0.0
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    eager_model = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y_eager = eager_model(x)
    torch.testing.assert_close(y, y_eager, atol=1e-5, rtol=1e-5)
    (gx,) = torch.autograd.grad(y.square().sum(), x)
    (gx_eager,) = torch.autograd.grad(y_eager.square().sum(), x)
    torch.testing.assert_close(gx, gx_eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.stem[1].running_var, eager_model.stem[1].running_var)


def test_autocast_cpu_bfloat16_like_torch():
    torch.manual_seed(0)
    theirs = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.MaxPool2d(2),
                                 torch.nn.ConvTranspose2d(8, 4, 2, stride=2), torch.nn.Sigmoid())
    ours = pyops.swap(copy.deepcopy(theirs))
    x = torch.randn(2, 3, 10, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hs_ours, hs_theirs = [], []
        h_o, h_t = x, x
        for a, b in zip(ours, theirs):
            h_o, h_t = a(h_o), b(h_t)
            hs_ours.append(h_o)
            hs_theirs.append(h_t)
    for a, b in zip(hs_ours, hs_theirs):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), atol=3e-2, rtol=3e-2)
    assert hs_ours[0].dtype == torch.bfloat16  # the conv ran in bfloat16
    assert ours[1].running_mean.dtype == torch.float32  # BN statistics stay float32
    torch.testing.assert_close(ours[1].running_mean, theirs[1].running_mean, atol=1e-2, rtol=1e-2)


# ---------------------------------------------------------------- DDP over gloo


def _ddp_worker(rank: int, world: int, init_file: str, result_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = pyops.swap(TinyResNet())  # (DDP refuses SyncBatchNorm on CPU modules, torch's or ours)
        ddp = DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        torch.manual_seed(1 + rank)  # each rank its own data
        for _ in range(2):
            x = torch.randn(4, 3, 16, 16)
            loss = ddp(x).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        torch.save({k: v.detach() for k, v in model.named_parameters()}, os.path.join(result_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_trains_a_swapped_model_with_identical_replicas():
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_ddp_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        a, b = (torch.load(os.path.join(tmp, f"{r}.pt")) for r in range(2))
    torch.manual_seed(0)
    start = dict(TinyResNet().named_parameters())
    assert a.keys() == b.keys() == start.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)  # replicas identical
    assert all(not torch.equal(a[k], start[k]) for k in a if k.endswith("weight"))  # and they trained
