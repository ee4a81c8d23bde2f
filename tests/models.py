"""Small models in the style of real architectures, written with plain torch.nn layers.

Used by the swap tests: ResNet (residual blocks, strided 1x1 shortcut, stem max-pool),
MobileNet (depthwise-separable convs), SqueezeNet/GoogLeNet (Fire modules with
concatenated branches, ceil-mode pooling, a 3x3/1 average-pool branch), and a small
U-Net (ConvTranspose2d decoder with skip connections and a sigmoid mask head).
"""
import torch
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class TinyResNet(nn.Module):
    def __init__(self, classes=5, width=8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        self.layers = nn.ModuleList([BasicBlock(width, width), BasicBlock(width, 2 * width, 2)])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(2 * width, classes))

    def forward(self, x):
        x = self.stem(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.pool(x).flatten(1))


class TinyMobileNet(nn.Module):
    def __init__(self, classes=5):
        super().__init__()

        def separable(cin, cout, stride):
            return nn.Sequential(nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin),
                                 nn.ReLU6(), nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU6())

        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
                                      separable(8, 16, 1), separable(16, 24, 2),
                                      nn.Conv2d(24, 24, 3, padding=2, dilation=2, groups=4))
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(24, classes))

    def forward(self, x):
        return self.classifier(self.features(x).mean((2, 3)))


class Fire(nn.Module):
    def __init__(self, cin, squeeze, expand):
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.branches = nn.ModuleDict({
            "e1": nn.Conv2d(squeeze, expand, 1),
            "e3": nn.Conv2d(squeeze, expand, 3, padding=1),
            "pool": nn.Sequential(nn.AvgPool2d(3, 1, 1, count_include_pad=False), nn.Conv2d(squeeze, expand, 1)),
        })

    def forward(self, x):
        s = torch.relu(self.squeeze(x))
        return torch.relu(torch.cat([b(s) for b in self.branches.values()], 1))


class TinySqueezeNet(nn.Module):
    def __init__(self, classes=5):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 12, 3, 2), nn.ReLU(), nn.MaxPool2d(3, 2, ceil_mode=True),
                                      Fire(12, 4, 6), nn.MaxPool2d(3, 2, ceil_mode=True), Fire(18, 6, 8))
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(24, classes, 1), nn.ReLU(),
                                        nn.AvgPool2d(2, ceil_mode=True))

    def forward(self, x):
        return self.classifier(self.features(x)).mean((2, 3))


class TinyUNet(nn.Module):
    def __init__(self, width=6):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())

        self.enc1, self.enc2 = block(3, width), block(width, 2 * width)
        self.down = nn.MaxPool2d(2)
        self.mid = block(2 * width, 2 * width)
        self.up2 = nn.ConvTranspose2d(2 * width, 2 * width, 2, stride=2)
        self.dec2 = block(4 * width, width)
        self.up1 = nn.ConvTranspose2d(width, width, 3, stride=2, padding=1, output_padding=1)
        self.dec1 = block(2 * width, width)
        self.head = nn.Sequential(nn.Dropout(0.1), nn.Conv2d(width, 1, 1), nn.Sigmoid())

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(self.down(e1))
        m = self.mid(self.down(e2))
        d2 = self.dec2(torch.cat([self.up2(m), e2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))
        return self.head(d1)


MODELS = {"resnet": TinyResNet, "mobilenet": TinyMobileNet, "squeezenet": TinySqueezeNet, "unet": TinyUNet}
