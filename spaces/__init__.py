"""The FIKA Assistant Space (installed as `fika.spaces`): `app.py` serves it, `export.py` writes a Space folder."""
