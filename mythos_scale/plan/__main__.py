import sys

from mythos_scale.plan.cli import main

sys.exit(main())
