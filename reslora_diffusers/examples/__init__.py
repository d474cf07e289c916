"""The emoji example (the embedded default's data), not part of the adapter library: its captions, fixed split
and metadata (`emoji_data.py`), and the retrieval measure of a base trained on it (`emoji_eval.py`)."""
