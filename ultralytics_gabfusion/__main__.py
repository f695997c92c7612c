"""``python -m ultralytics_gabfusion`` is the ``yolo-gab`` command."""

from .cli import entry

if __name__ == "__main__":
    entry()
