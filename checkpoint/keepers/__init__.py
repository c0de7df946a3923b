"""Level 1: the SnapshotKeepers (one per node), their shared-memory arenas, erasure-coded groups, and the service that commits and persists what they hold."""
