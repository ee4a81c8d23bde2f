# Thin aliases for the scripts (the scripts are what the README documents).
.PHONY: setup test bench gpu-check aot sanitize

setup:
	scripts/setup_env.sh

test:
	scripts/test.sh

bench:
	scripts/bench.sh

gpu-check:
	scripts/gpu_check.sh gpu_out

aot:
	.venv/bin/python -P -m pyops._aot

sanitize:
	scripts/sanitize.sh
