from transformers import BertTokenizerFast

from pipeline.train import SPECIAL_TOKENS, build_synthetic_mlm, wordpiece_vocabulary
from pipeline.config import StudentConfig


def test_vocabulary_spells_any_word_and_keeps_frequent_words_whole():
    texts = ["kalo mife kalo", "zeru kalo, mife!"]
    vocabulary = wordpiece_vocabulary(texts, size=100)
    assert vocabulary[:5] == SPECIAL_TOKENS
    characters = {c for c in "kalomifezeru,!"}
    assert characters <= set(vocabulary) and {f"##{c}" for c in characters} <= set(vocabulary)
    words = vocabulary[5 + 2 * len(characters):]
    assert words == ["kalo", "mife", "zeru"]  # by frequency, ties alphabetically
    assert wordpiece_vocabulary(texts, size=5 + 2 * len(characters) + 1)[-1] == "kalo"


def test_synthetic_student_tokenizes_as_trained(tmp_path):
    build_synthetic_mlm(["kalo mife kalo", "zeru kalo mife"], StudentConfig(vocab_size=100, hidden_size=16), 32,
                        tmp_path)
    tokenizer = BertTokenizerFast.from_pretrained(tmp_path)
    assert tokenizer.tokenize("Kalo zeru") == ["kalo", "zeru"]
    assert tokenizer.tokenize("zamo") == ["z", "##a", "##m", "##o"]  # unseen word: spelt, not [UNK]
