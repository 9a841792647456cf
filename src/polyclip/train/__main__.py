"""``python -m polyclip.train RECIPE ...`` (what torchrun launches); see `polyclip.train.launch`."""

from polyclip.train.launch import main

raise SystemExit(main())
