"""``python -m beam_pipeline --input PATH --output DIR [options] [Beam options]``."""
import logging

from beam_pipeline.pipeline import run


def main() -> None:
    logging.getLogger().setLevel(logging.WARNING)
    run()


if __name__ == "__main__":
    main()
