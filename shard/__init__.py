"""The shard process: owns the rooms that hash to it."""
