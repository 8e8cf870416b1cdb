"""``python -m cellfm_sc.cli``: the ``cellfm-sc`` command line."""

from cellfm_sc.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
