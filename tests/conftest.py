import sys
from pathlib import Path

# Tests import the top-level modules (model, tokenizer, ...) the way the scripts do.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
