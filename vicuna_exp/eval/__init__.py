"""Chatbot evaluation of a run: answer a question set, grade with an LLM judge, report.

Three steps, each a Hydra task (`vicuna-exp eval generate|judge|report`), all writing
FastChat-format JSONL under `RUN_DIR/eval/<bench>/` so MT-bench tooling can read them.
Import-light: nothing here imports torch or transformers at module level.
"""
