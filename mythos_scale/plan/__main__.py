import sys

from mythos_scale.plan.plan_cli import main

sys.exit(main())
