"""``python -m beam_pipeline --input PATH --output DIR [options] [Beam options]``."""
import logging
import sys


class _KnownHarmless(logging.Filter):
    """Drops the one warning every ``import apache_beam`` prints without apitools installed (it
    concerns BigQuery, which this tool never uses); every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == "root" and record.getMessage().startswith("apitools not found"))


logging.getLogger().addFilter(_KnownHarmless())  # before apache_beam is first imported (by cli)

from beam_pipeline import cli  # noqa: E402


def main() -> None:
    sys.exit(cli.main())


if __name__ == "__main__":
    main()
