"""``python -m beam_pipeline --input PATH --output DIR [options] [Beam options]``."""
import gc
import sys


# Importing Beam creates some 200,000 long-lived objects; the cyclic collector would walk them
# again and again while they load and during the run (about 0.25 s of a 3 s run). Load them with
# the collector off, then move them out of its sight (gc.freeze; the few import-time cycles stay
# for the life of the process) and let it collect what the run itself leaves behind. This is the
# launcher's process, where the in-process runner works; multi-process and portable workers are
# started as new interpreters with the collector as usual.
_collecting = gc.isenabled()
gc.disable()
try:
    from beam_pipeline.run import cli  # noqa: E402
finally:
    gc.freeze()
    if _collecting:
        gc.enable()


def main() -> None:
    sys.exit(cli.main())


if __name__ == "__main__":
    main()
