"""`python -m vlmcredit` (what `torchrun -m vlmcredit ...` starts on every rank)."""

from vlmcredit.cli.main import main

main()
