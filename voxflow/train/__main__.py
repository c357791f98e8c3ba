"""``python -m voxflow.train`` (and ``torchrun --nproc-per-node N -m voxflow.train WORKDIR -c CFG -f K``)."""

from voxflow._cliutil import configure_logging
from voxflow.train._cli import train

if __name__ == "__main__":
    configure_logging(1)
    train()
