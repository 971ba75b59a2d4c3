"""AnchorOPT end to end (Stage I -> Stage II -> base / novel accuracy): the packaged demo, as a script.

    python examples/quickstart.py            # offline; the same as `anchoropt demo`
    python examples/quickstart.py --help     # a real open_clip model on your ImageFolder

The program lives in the package (anchoropt/runner/demo.py), so an installed wheel runs it too: `anchoropt demo`.
"""

from anchoropt.runner.demo import main

if __name__ == "__main__":
    raise SystemExit(main())
