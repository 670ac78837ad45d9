"""``python -m vae_priors.experiments.cli``: the same as the ``vae-priors`` command."""

import sys

from vae_priors.experiments.cli import main

sys.exit(main())
