"""Test-time adaptation ("dreaming") of the Introspection GRPO paper: GRPO on variations of an input
with a new lesson injected, to integrate that lesson into the weights.

NOT IMPLEMENTED YET: lands with its own issue. common.py already provides what it needs.
"""
import common


def main():
    raise common.UserError("dream.py is not implemented yet; see the open issues")


if __name__ == "__main__":
    common.run_main(main)
