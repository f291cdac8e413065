"""What every other part of meanflow may use, and which uses none of them: process groups and collectives
(distributed.py), atomic file writes (files.py), seeds (seeding.py), devices and CPU threads (host.py)."""
