"""``python -m mythos_scale.train`` (what launchers run): the same as ``mythos train``."""

import sys

from mythos_scale.train.train_cli import main

sys.exit(main())
