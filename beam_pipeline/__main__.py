"""``python -m beam_pipeline --input PATH --output DIR [options] [Beam options]``."""
import gc
import logging
import sys


# Importing Beam creates some 200,000 long-lived objects; the cyclic collector would walk them
# again and again while they load and during the run (about 0.25 s of a 3 s run). Load them with
# the collector off, then move them out of its sight (gc.freeze; the few import-time cycles stay
# for the life of the process) and let it collect what the run itself leaves behind. This is the
# launcher's process, where the in-process runner works; multi-process and portable workers are
# started as new interpreters with the collector as usual.
#
# Beam imports pyarrow (for Arrow batches) and pymongo (for MongoDB IO) when they are installed, as
# dependencies of apache-beam are: connectors this pipeline does not use, some 60 MB of the process
# and 0.15 s. They are kept out while Beam loads (Beam treats them as optional, and its notice
# about the missing bson package is not shown) and importable again afterwards.
_OPTIONAL = [name for name in ("pyarrow", "pyarrow_hotfix", "pymongo", "bson") if name not in sys.modules]
_collecting = gc.isenabled()
gc.disable()
sys.modules.update(dict.fromkeys(_OPTIONAL))
logging.getLogger("apache_beam.io.mongodbio").setLevel(logging.ERROR)
try:
    from beam_pipeline.run import cli  # noqa: E402
finally:
    for _name in _OPTIONAL:
        if _name in sys.modules and sys.modules[_name] is None:
            del sys.modules[_name]
    gc.freeze()
    if _collecting:
        gc.enable()


def main() -> None:
    sys.exit(cli.main())


if __name__ == "__main__":
    main()
