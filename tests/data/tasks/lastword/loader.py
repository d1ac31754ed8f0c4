"""lm-eval's custom_dataset for lastword.yaml: the JSONL beside this file as a one-split dataset."""

from pathlib import Path


def load(**kwargs):
    import datasets

    return datasets.load_dataset("json", data_files={"test": str(Path(__file__).with_name("lastword.jsonl"))})
