"""`python -m experiments.aot`: see `experiments.aot.cli`."""

from experiments.aot.cli import main

if __name__ == "__main__":
    main()
