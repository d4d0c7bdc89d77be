"""`torchrun --nproc_per_node N -m openk2.train [--preset demo] [--steps 100] ...`"""

from openk2.train import parse_args, train

train(parse_args(prog="python -m openk2.train"))
