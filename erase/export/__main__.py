"""``python -m erase.export DIR --export_format single_file,lora``: the offline converter (:mod:`erase.export.convert`)."""

from erase.export.convert import main

if __name__ == "__main__":
    raise SystemExit(main())
