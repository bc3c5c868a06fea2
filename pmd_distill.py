"""The PMD paper (Online Reflection for Self-Improving Language Models): an online three-level procedural memory (experience,
insight, behavior) and a memory-conditioned self-teacher distilled into the student.

NOT IMPLEMENTED YET: lands with its own issue. common.py already provides what it needs.
"""
import common


def main():
    raise common.UserError("pmd_distill.py is not implemented yet; see the open issues")


if __name__ == "__main__":
    common.run_main(main)
