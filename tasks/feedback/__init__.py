"""The interaction log: what the service answered, what users said of it, and its export to training data.

One module for the whole feedback loop, so the writer and its readers cannot drift apart:

- `schema`: the rows (`Interaction`, `FeedbackRow`) and the SQLite tables, with a schema
  version and the migrations that bring an older `feedback.db` up to it;
- `store`: `FeedbackStore`, the service's append-only writer (`POST /feedback` and one
  row per completion), and `FeedbackReader`, the read-only view the monitor uses while
  the service keeps writing;
- `export`: accepted answers and corrections as canonical `{"messages": [...]}` JSONL,
  what `ftllm feedback export` writes and a `feedback: true` data source trains on; it
  records the highest feedback id it read, which moves the monitor's cursor once a run
  has trained on it.

The database defaults to `<root>/feedback.db`; `FTLLM_FEEDBACK_DB` points it elsewhere.
"""

from tasks.feedback.export import FeedbackExport, export_feedback, training_examples
from tasks.feedback.reader import FeedbackReader
from tasks.feedback.schema import MAX_RATING, MIN_RATING, SCHEMA_VERSION, FeedbackRow, Interaction
from tasks.feedback.snapshot import FeedbackSnapshot, snapshot_feedback
from tasks.feedback.store import FeedbackStore, default_db_path

__all__ = [
    "MAX_RATING", "MIN_RATING", "SCHEMA_VERSION", "FeedbackExport", "FeedbackReader", "FeedbackRow", "FeedbackSnapshot",
    "FeedbackStore", "Interaction", "default_db_path", "export_feedback", "snapshot_feedback", "training_examples",
]
