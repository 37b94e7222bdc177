"""``python -m stillsvc.ctl``: stillctl."""

import sys

from stillsvc.ctl.main import main

sys.exit(main())
