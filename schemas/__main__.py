"""``python -m schemas``: regenerate the committed JSON Schema files from the models."""

from schemas import JSON_DIR, json_schemas


def main() -> None:
    JSON_DIR.mkdir(exist_ok=True)
    for stale in {p.name for p in JSON_DIR.glob("*.schema.json")} - set(json_schemas()):
        (JSON_DIR / stale).unlink()
    for name, text in json_schemas().items():
        (JSON_DIR / name).write_text(text)
        print(JSON_DIR / name)


if __name__ == "__main__":  # importing (e.g. a doctest collector) must not rewrite the files
    main()
