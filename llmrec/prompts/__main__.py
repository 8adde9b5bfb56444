"""`python -m llmrec.prompts`: record (version, hash) of every template in prompts/versions.lock after a version
bump; refuses when a template changed but its version did not."""

import json

from llmrec.prompts.templates import write_lock

print(json.dumps(write_lock(), indent=2))
