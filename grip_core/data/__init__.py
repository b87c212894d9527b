"""QA data: the example type, readers for user files, the demo world's splits, batching and answers.

Contract (docs/architecture.md): batches are right-padded {input_ids, attention_mask, labels}
with labels -100 except on the answer tokens and the closing EOS; the prompt is
PROMPT_TEMPLATE followed by " {answer}" + EOS.
"""
from .encode import (IGNORE_INDEX, PROMPT_TEMPLATE, encode_qa, exact_match, format_prompt, generate_answers,
                     iter_batches, normalize_answer)
from .examples import DataFileError, QAExample, read_qa_file
from .world import SCENARIOS, WORLD_DIR, DemoSplits, load_demo_world

__all__ = ["IGNORE_INDEX", "PROMPT_TEMPLATE", "DataFileError", "DemoSplits", "QAExample", "SCENARIOS", "WORLD_DIR",
           "encode_qa", "exact_match", "format_prompt", "generate_answers", "iter_batches", "load_demo_world",
           "normalize_answer", "read_qa_file"]
