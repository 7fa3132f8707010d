"""The platform's schema, a simulator of its traffic, and the one-command demo."""
from importlib.resources import files


def schema_sql() -> str:
    return files("zsmon.demo").joinpath("schema.sql").read_text(encoding="utf-8")
