#!/usr/bin/env python
"""The CPU demo (``make demo``): teacher -> student with and without PKD -> one AP table.
See pkd/demo.py; ``--methods PKD,MSE`` compares several methods."""
from pkd.demo import main

if __name__ == "__main__":
    main()
