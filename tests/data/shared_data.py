"""Where the real dataset records live when this checkout has them (tests skip otherwise)."""

import pathlib

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
