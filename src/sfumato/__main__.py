"""`python -m sfumato ...` and `torchrun --nproc_per_node N -m sfumato train ...`."""

from sfumato.cli import main

raise SystemExit(main())
