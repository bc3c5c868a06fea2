"""Phase 2 of the Introspection GRPO paper: SFT that teaches the model to recall the best
introspection for a question type inside <recall>...</recall> before answering.

NOT IMPLEMENTED YET: lands with its own issue. common.py already provides what it needs.
"""
import common


def main():
    raise common.UserError("sft_recall.py is not implemented yet; see the open issues")


if __name__ == "__main__":
    common.run_main(main)
