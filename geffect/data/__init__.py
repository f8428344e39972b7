"""Data: TOFU-format records, the bundled fictitious-author data set and batching."""
from geffect.data.records import DataError, QARecord, load_records
from geffect.data.synthetic import default_splits, idk_answers

__all__ = ["DataError", "QARecord", "default_splits", "idk_answers", "load_records"]
