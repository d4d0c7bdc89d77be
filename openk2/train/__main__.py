"""`torchrun --nproc_per_node N -m openk2.train [--preset demo] [--steps 100] ...`"""

from openk2.train import parse_args, train

try:
    train(parse_args(prog="python -m openk2.train"))
except (ValueError, KeyError, OSError) as e:  # bad flags, paths, data: one line, not a traceback
    raise SystemExit(f"openk2.train: error: {e}")
