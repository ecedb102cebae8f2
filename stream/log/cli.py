"""``streamrec log compact`` and ``streamrec log vacuum``: maintenance of the Delta log by hand.

The worker compacts closed hours on its own; these commands do the same on demand (after a
backfill, before an export) and remove the files no recent version refers to. Both are Delta
commits, safe while workers append.
"""
from __future__ import annotations

import argparse
import json

from stream.config import StreamSettings
from stream.log.maintenance import TARGET_BYTES, compact, vacuum
from stream.log.table import DeltaLog


def _log(args: argparse.Namespace) -> DeltaLog:
    settings = StreamSettings()
    options = json.loads(args.storage_options) if args.storage_options else settings.log_storage_options
    return DeltaLog(settings.log_root(args.log_dir), options)


def cmd_compact(args: argparse.Namespace) -> int:
    event_log = _log(args)
    for report in compact(event_log, args.min_files, args.min_age_s, args.target_mb * 1024 * 1024):
        print(f"{report.dataset}: {report.partitions} hours compacted, {report.files_removed} files into "
              f"{report.files_added}; {event_log.data_files(report.dataset)} data files now"
              + (f" ({report.conflicts} hours left to a concurrent compaction)" if report.conflicts else ""))
    return 0


def cmd_vacuum(args: argparse.Namespace) -> int:
    event_log = _log(args)
    removed = vacuum(event_log, args.retention_hours, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for dataset, count in removed.items():
        print(f"{dataset}: {verb} {count} files no version of the last {args.retention_hours} h refers to")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``streamrec log {compact,vacuum}`` to the console script's subcommands."""
    defaults = StreamSettings()
    p = sub.add_parser("log", help="maintain the Delta log: compact small files, vacuum unreferenced ones",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--log-dir", default=None,
                       help=f"log root, a folder or an s3://... URL (default {defaults.log_dir})")
        q.add_argument("--storage-options", default=None,
                       help="object-store options as a JSON object (default $STREAMREC_LOG_STORAGE_OPTIONS)")

    q = actions.add_parser("compact", help="rewrite the small files of closed hours into large ones")
    common(q)
    q.add_argument("--min-files", type=int, default=2, help="compact an hour holding at least this many small files (default 2)")
    q.add_argument("--min-age-s", type=float, default=0.0,
                   help="only hours that closed at least this long ago (default 0: every hour but the current one)")
    q.add_argument("--target-mb", type=int, default=TARGET_BYTES // (1024 * 1024),
                   help=f"file size to aim for, in MiB (default {TARGET_BYTES // (1024 * 1024)})")
    q.set_defaults(func=cmd_compact)

    q = actions.add_parser("vacuum", help="delete files no version of the last RETENTION hours refers to")
    common(q)
    q.add_argument("--retention-hours", type=int, default=168,
                   help="keep the files of every version this recent (default 168: a week; readers of older "
                        "versions lose their files)")
    q.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    q.set_defaults(func=cmd_vacuum)
