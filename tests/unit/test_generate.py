"""train.generate on a chat model (a tiny Llama with the ChatML tokenizer): a plain question goes through the
template, greedy decoding is transformers' argmax, generation stops at the template's end of turn, and the turns
are printed apart."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from tests.helpers import tiny_llama
from train.generate import end_of_turn_ids, generate_text
from train.generate import main as generate_main

QUESTION = "Who begat Enos?"


@pytest.fixture(scope="module")
def chat_model(chat_tokenizer_dir, tmp_path_factory):
    """A random untied tiny Llama whose <|im_end|> head row is the one of its third greedy answer token, scaled
    up: the end of turn wins where that token would (or earlier), so the answer stops before the token limit."""
    tokenizer = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    torch.manual_seed(0)
    config = {k: v for k, v in tiny_llama(vocab_size=len(tokenizer)).items() if k != "model_type"}
    model = AutoModelForCausalLM.from_config(LlamaConfig(**config)).eval()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True, return_dict=False
    )
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    third = greedy(model, prompt, 3, stops=[])[2]
    with torch.no_grad():
        model.lm_head.weight[end] = model.lm_head.weight[third] * 1.5
    folder = tmp_path_factory.mktemp("chat_model")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model, tokenizer, prompt


def greedy(model, prompt: list[int], tokens: int, stops: list[int]) -> list[int]:
    """Argmax decoding by hand, a full forward per token, ending after a stop token."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(tokens):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            if ids[-1] in stops:
                break
    return ids[len(prompt) :]


def test_a_question_is_answered_through_the_template_greedily_and_stops_at_the_end_of_turn(chat_model):
    folder, model, tokenizer, prompt = chat_model
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_ids(tokenizer) == [tokenizer.eos_token_id, end]
    expected = greedy(model, prompt, 20, stops=[end, tokenizer.eos_token_id])
    assert expected[-1] == end and len(expected) <= 3  # it stopped, well before the limit
    answer = tokenizer.decode(expected, skip_special_tokens=True).strip()
    for seed in (0, 1):  # greedy: the seed changes nothing
        text = generate_text(folder, QUESTION, max_new_tokens=20, temperature=0.0, seed=seed)
        assert text == f"user: {QUESTION}\nassistant: {answer}"
    # Without the template the question is continued as text, through the end-of-turn token, to the limit.
    plain = generate_text(folder, QUESTION, max_new_tokens=6, temperature=0.0, chat=False)
    ids = tokenizer(QUESTION)["input_ids"]
    assert plain == tokenizer.decode(ids + greedy(model, ids, 6, stops=[]), skip_special_tokens=True)


def test_a_messages_file_is_continued_as_the_next_assistant_turn(chat_model, tmp_path, capsys):
    folder, model, tokenizer, _ = chat_model
    messages = [{"role": "system", "content": "You are a scribe."}, {"role": "user", "content": QUESTION}]
    (tmp_path / "messages.json").write_text(json.dumps({"messages": messages}))
    assert generate_main([str(folder), "--messages", str(tmp_path / "messages.json"), "--greedy"]) == 0
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    answer = tokenizer.decode(greedy(model, prompt, 60, stops=end_of_turn_ids(tokenizer)), skip_special_tokens=True)
    expected = f"system: You are a scribe.\nuser: {QUESTION}\nassistant: {answer.strip()}"
    assert capsys.readouterr().out.strip().splitlines()[-3:] == expected.splitlines()
