"""Cross-platform numerical alignment: record fingerprints of a short run, compare two records.

See docs/alignment.md for the migration procedure and `moe-plugin align --help`.
"""

from moe_plugin.align.compare import Comparison, Tolerances, compare_records, default_tolerances, format_comparison
from moe_plugin.align.fingerprint import Fingerprint, compare_fingerprints, fingerprint
from moe_plugin.align.record import RecordConfig, load_record, record, save_record

__all__ = [
    "Comparison",
    "Fingerprint",
    "RecordConfig",
    "Tolerances",
    "compare_fingerprints",
    "compare_records",
    "default_tolerances",
    "fingerprint",
    "format_comparison",
    "load_record",
    "record",
    "save_record",
]
