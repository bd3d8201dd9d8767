"""Tests of answers.py: extraction of the final answer from sampled responses and matching it against the ground
truth, as difficulty estimation and evaluation use them. Each case names the rule it checks, and the failure
message repeats it. No model, no torch.

    python -m pytest -q test_answers.py
"""
import pytest

from answers import answers_match, extract_answer, normalize_answer, parse_options

# ----------------------------------------------------------------------------------------------------
# extract_answer: (id, response, expected, rule)

EXTRACT_CASES = [
    ("tag", "<think>The tallest bar is 2020.</think><answer>B</answer>", "B", "the <answer> tag holds the answer"),
    ("last_tag_wins", "<answer>A</answer> wait, recheck... <answer>12</answer>", "12", "the last tag decides"),
    ("truncated_tag", "Counting the apples.\n<answer> 42 cm", "42 cm", "an unclosed tag runs to the end"),
    ("unclosed_then_new_tag", "<answer>A</think><answer>B", "B", "the last <answer> opening decides"),
    ("unclosed_cut_at_tag", "<answer>7</think> Let me check that again.", "7", "tag text ends at the next tag"),
    ("tag_cut_at_special", "<answer>7<|im_end|>", "7", "tag text ends at a special-token tag"),
    ("tag_multiline", "<answer>\nB\n</answer>", "B", "tag content is stripped"),
    ("phrase_inside_tag", "<answer>The answer is C.</answer>", "C", "'the answer is' also runs inside the tag"),
    ("boxed_inside_tag", "<answer>so \\boxed{7}</answer>", "7", "\\boxed also runs inside the tag"),
    ("boxed_nested", "Thus the ratio is \\boxed{\\frac{3}{4}}.", "\\frac{3}{4}", "nested braces stay in the box"),
    ("boxed_nested_deep", "We get \\boxed{a^{2}+b^{2}} as claimed.", "a^{2}+b^{2}", "nested braces stay in the box"),
    ("last_boxed_wins", "First \\boxed{5}, corrected: \\boxed{6}", "6", "the last box decides"),
    ("boxed_text", "\\boxed{\\text{Paris}}.", "Paris", "\\text{} is unwrapped"),
    ("boxed_over_phrase", "The answer is 5? No: \\boxed{6}", "6", "a box beats a phrase"),
    ("answer_is", "The triangle is isosceles, so the answer is 12.", "12", "text after 'the answer is'"),
    ("answer_is_decimal_kept", "The answer is 3.14 meters. Done.", "3.14 meters", "a decimal point is no sentence end"),
    ("last_answer_is_wins", "I think the answer is B. Checking again, the answer is C.", "C", "last phrase wins"),
    ("answer_should_be", "Hence the answer should be 42.", "42", "'should be' is an answer phrase"),
    ("this_answer_is_chatter", "The answer is 12.\nI hope this answer is helpful.", "12", "'this answer is': chatter"),
    ("final_answer_colon", "Step 1: ...\nFinal Answer: (B)", "(B)", "'Final Answer:' is an answer phrase"),
    ("markdown_bold", "Reasoning...\n**Final Answer:** 3.5 cm", "3.5 cm", "markdown bold around the phrase"),
    ("answer_on_next_line", "The answer is\n15", "15", "an empty phrase falls back to the last line"),
    ("phrase_in_think_only", "<think>So the answer is 5.</think>", "5", "tags never glue onto the answer"),
    ("after_think", "<think>Count them: 4 and 5.</think> 9", "9", "the reply after </think> holds the answer"),
    ("dollar_wrapped", "The answer is $\\frac{1}{2}$.", "\\frac{1}{2}", "surrounding $...$ is unwrapped"),
    ("currency_kept", "the answer is $3.50. That's the price", "$3.50", "a lone $ is currency, kept"),
    ("text_wrapper", "$\\text{yes}$", "yes", "$\\text{}$ is unwrapped"),
    ("last_line", "Step 1: count rows.\nStep 2: multiply.\n\n15\n\n", "15", "no tag/box/phrase: the last line"),
    ("empty", "", "", "nothing in, nothing out"),
]


@pytest.mark.parametrize("response,expected,rule", [c[1:] for c in EXTRACT_CASES], ids=[c[0] for c in EXTRACT_CASES])
def test_extract_answer(response, expected, rule):
    assert extract_answer(response) == expected, rule


# ----------------------------------------------------------------------------------------------------
# answers_match(extract_answer(response), truth, question): (id, response, truth, question, expected, rule)

Q_BARS = ("Which year has the tallest bar?\nA. 2019\nB. 2020\nC. 2021\nD. 2022\n"
          "Answer with the option's letter from the given choices directly.")
Q_ANGLE = ("In the figure, angle ABC = 40°. What is angle ACB? "
           "Choices: A: 30°, B: 50°, C: 60°, D: 70°")
Q_RECT = "What is the perimeter of the rectangle?\n(A) 12 cm\n(B) 15 cm\n(C) 18 cm\n(D) 24 cm"
Q_APPLES = "How many apples are in the picture? A. 12 B. 15 C. 18 D. 21"
Q_YESNO = "Question: Is Navy Blue the minimum?\nChoices:\n(A) yes\n(B) no"

MC = [  # multiple choice
    ("mc_letter", "B", "B", Q_BARS, True, "letter equals letter"),
    ("mc_paren", "(B)", "B", Q_BARS, True, "(B) is the letter B"),
    ("mc_period", "B.", "B", Q_BARS, True, "B. is the letter B"),
    ("mc_letter_with_text", "B) 2020", "B", Q_BARS, True, "B) text is the letter B"),
    ("mc_option_word", "Option B", "B", Q_BARS, True, "'Option B' is the letter B"),
    ("mc_answer_is", "Looking at the bars, the answer is B.", "B", Q_BARS, True, "letter after 'the answer is'"),
    ("mc_tag_lowercase", "<answer>b</answer>", "B", None, True, "letters compare case-insensitively"),
    ("mc_wrong_letter", "C", "B", Q_BARS, False, "different letters differ"),
    ("mc_letter_wins_over_text", "A) 2020", "B", Q_BARS, False, "with letter and text, the letter decides"),
    ("mc_wrong_letter_no_question", "The answer is A", "B", None, False, "different letters differ"),
    ("mc_text_pred_letter_truth", "2020", "B", Q_BARS, True, "option text equals its letter"),
    ("mc_wrong_text_pred", "2021", "B", Q_BARS, False, "another option's text is not the letter"),
    ("mc_letter_pred_text_truth", "C", "60°", Q_ANGLE, True, "letter equals its option text"),
    ("mc_wrong_letter_text_truth", "D", "60°", Q_ANGLE, False, "another letter is not the option text"),
    ("mc_text_units_vs_letter", "60 degrees", "C", Q_ANGLE, True, "option text compares as a number with units"),
    ("mc_paren_options_letter", "(C) 18 cm", "C", Q_RECT, True, "(A) (B) options parse"),
    ("mc_paren_options_text", "18", "C", Q_RECT, True, "option text with units equals a bare number"),
    ("mc_inline_options", "B", "15", Q_APPLES, True, "options on one line parse"),
    ("mc_inline_wrong", "C", "15", Q_APPLES, False, "another inline option differs"),
    ("mc_letter_without_options", "B", "15", None, False, "a letter means nothing without options"),
    ("mc_yes_option", "A", "yes", Q_YESNO, True, "letter of a yes/no option"),
    ("mc_no_text_vs_letter", "no", "B", Q_YESNO, True, "yes/no text vs its letter"),
    ("mc_word_number_option", "fifteen", "B", Q_APPLES, True, "a number word equals a numeric option"),
    # a choice named inside a sentence, only when the question lists options
    ("mc_sentence_option_is", "I think the correct option is (C) because it is the tallest.", "C", Q_BARS, True,
     "'option is (C)' in a sentence names C"),
    ("mc_sentence_option_is_wrong", "I think the correct option is (C) because it is the tallest.", "B", Q_BARS,
     False, "'option is (C)' does not name B"),
    ("mc_sentence_must_be", "So the answer must be C, since the others are lower.", "C", Q_BARS, True,
     "'answer must be C, since' names C"),
    ("mc_sentence_must_be_wrong", "So the answer must be C, since the others are lower.", "D", Q_BARS, False,
     "'answer must be C' does not name D"),
    ("mc_sentence_to_text", "I think the correct option is (B) because it is tallest.", "2020", Q_BARS, True,
     "a named choice compares by its option text"),
    ("mc_sentence_verb_beats_bare", "Not option A; I think the correct option is (C).", "C", Q_BARS, True,
     "'option is (C)' beats a bare 'option A'"),
    ("mc_sentence_verb_beats_bare_neg", "Not option A; I think the correct option is (C).", "A", Q_BARS, False,
     "a rejected 'option A' is not the answer"),
    ("mc_sentence_bare_option", "Looking again, I pick option D for this one", "D", Q_BARS, True,
     "a bare 'option D' names D"),
    ("mc_sentence_would_be", "Bar A looks low, so the best choice would be (D).", "D", Q_BARS, True,
     "'choice would be (D)' names D"),
    ("mc_sentence_paren_unique", "Comparing the bars, (B) is clearly the tallest one.", "B", Q_BARS, True,
     "one '(X)' in a sentence names X"),
    ("mc_sentence_paren_ambiguous", "It is between (B) and (C), hard to say.", "B", Q_BARS, False,
     "two different '(X)' name nothing"),
    ("mc_sentence_article_a", "A bar for 2021 is the tallest one", "A", Q_BARS, False,
     "a capital 'A' starting a sentence is an article"),
    ("mc_sentence_no_question", "So the answer must be C, since the others are lower.", "C", None, False,
     "no letters from sentences without listed options"),
    ("mc_sentence_letter_not_listed", "I think the correct option is (E); no E, so (C).", "C", Q_BARS, True,
     "a letter that is not an option is skipped"),
]

NUMBERS = [
    ("num_thousands_pred", "1,234", "1234", None, True, "thousands separators"),
    ("num_thousands_truth", "There are 1234 people.\nThe answer is 1234", "1,234", None, True, "separators in truth"),
    ("num_units", "12 cm", "12", None, True, "units are ignored"),
    ("num_square_units", "The area is 24 cm^2, so the answer is 24 cm^2.", "24", None, True, "cm^2 is a unit"),
    ("num_power_not_unit", "10^3", "10", None, False, "'10^3' is not 10 with a unit '^3'"),
    ("num_degrees_latex", "\\boxed{45^\\circ}", "45", None, True, "^\\circ is dropped"),
    ("num_degrees_words", "45 degrees", "45°", None, True, "° and 'degrees' are units"),
    ("num_currency", "$3.50", "3.5", None, True, "currency sign is dropped"),
    ("num_percent_face", "30%", "30", None, True, "a percent equals its face value"),
    ("num_percent_fraction", "30%", "0.3", None, True, "a percent equals value/100"),
    ("num_percent_truth", "0.3", "30\\%", None, True, "\\% in truth"),
    ("num_percent_rounds", "33.33%", "0.3333", None, True, "value/100 keeps places + 2"),
    ("num_fraction_vs_decimal", "3/4", "0.75", None, True, "a fraction equals its decimal"),
    ("num_latex_frac", "\\boxed{\\frac{3}{4}}", "0.75", None, True, "\\frac is a fraction"),
    ("num_decimal_vs_fraction", "0.75", "3/4", None, True, "a decimal equals a fraction truth"),
    ("num_int_float", "12.0", "12", None, True, "12.0 is 12"),
    ("num_variable_prefix", "x = 5", "5", None, True, "'x = ' is dropped"),
    ("num_unicode_minus", "−3", "-3", None, True, "unicode minus"),
    ("num_off_by_one", "13", "12", None, False, "integers exact"),
    ("num_extra_digit", "120", "12", None, False, "integers exact"),
    ("num_int_exact", "12.5", "12", None, False, "an integer truth is not rounded to"),
    ("num_near_int", "11.99", "12", None, False, "an integer truth is not rounded to"),
    ("num_no_percent_no_scale", "30", "0.3", None, False, "only a percent is scaled"),
    ("num_two_numbers", "12 or 13", "12", None, False, "two numbers are not one"),
    ("num_decimal_not_thousands", "1,234", "1.234", None, False, "a comma is no decimal point"),
    ("num_negative", "-5", "5", None, False, "the sign counts"),
    # precision: a decimal must round to the truth as written, no relative tolerance
    ("prec_rounds_5dp", "3.14159", "3.14", None, True, "rounds to the truth's places"),
    ("prec_rounds_4dp", "3.1416", "3.14", None, True, "rounds to the truth's places"),
    ("prec_rounds_down", "3.1449", "3.14", None, True, "3.1449 rounds to 3.14"),
    ("prec_rounds_1dp", "3.14159", "3.1", None, True, "rounds to the truth's one place"),
    ("prec_trailing_zero", "3.140", "3.14", None, True, "trailing zeros are the same value"),
    ("prec_rounds_up_away", "3.146", "3.14", None, False, "3.146 rounds to 3.15, not 3.14"),
    ("prec_far", "3.2", "3.14", None, False, "a different value"),
    ("prec_fewer_places", "3.1", "3.14", None, False, "a coarser pred is not the finer truth"),
    ("prec_no_rel_tol", "100.4", "100.0", None, False, "no 1% relative tolerance"),
    ("prec_frac_pred", "1/3", "0.33", None, True, "a fraction rounds to the truth's places"),
    ("prec_frac_pred_wrong", "1/3", "0.34", None, False, "1/3 does not round to 0.34"),
    ("prec_frac_truth", "0.33", "1/3", None, True, "a fraction truth rounds to the pred's places"),
    ("prec_frac_truth_3dp", "0.333", "1/3", None, True, "a fraction truth rounds to the pred's places"),
    ("prec_frac_truth_wrong", "0.34", "1/3", None, False, "1/3 does not round to 0.34"),
    ("prec_frac_truth_1dp", "0.3", "1/3", None, False, "a fraction needs 2+ places written"),
    ("prec_frac_truth_int", "0", "1/3", None, False, "a fraction needs 2+ places written"),
    # number words
    ("words_three", "three", "3", None, True, "number word"),
    ("words_zero", "zero", "0", None, True, "number word zero"),
    ("words_twelve_units", "I count them.\nThe answer is twelve apples.", "12", None, True, "number word, units"),
    ("words_twenty", "Twenty", "20", None, True, "number word, capitalized"),
    ("words_forty", "forty", "40", None, True, "tens word"),
    ("words_forty_two", "forty-two", "42", None, True, "tens-units word"),
    ("words_truth", "7", "seven", None, True, "number word in the truth"),
    ("words_wrong", "three", "4", None, False, "a number word has its value"),
    ("words_seventeen", "seventeen", "7", None, False, "seventeen is not seven"),
    ("words_sixty", "sixty", "6", None, False, "sixty is not six"),
    # scientific notation
    ("sci_e", "1.2e3", "1200", None, True, "e notation"),
    ("sci_e_upper_sign", "1.2E+3", "1200", None, True, "E+ notation"),
    ("sci_x", "1.2 x 10^3", "1200", None, True, "x 10^n"),
    ("sci_times_latex", "The answer is $1.2 \\times 10^{3}$.", "1200", None, True, "\\times 10^{n}"),
    ("sci_negative_exp", "5 \\times 10^{-3}", "0.005", None, True, "negative exponent"),
    ("sci_truth", "1200 m", "1.2e3", None, True, "scientific notation in the truth"),
    ("sci_wrong_exp", "1.2e4", "1200", None, False, "the exponent counts"),
    ("sci_int_exact", "1.2e3", "1234", None, False, "1.2e3 is the integer 1200, exact"),
    ("sci_int_truth_exact", "1200.04", "1.2e3", None, False, "a 1.2e3 truth is the integer 1200, exact"),
    ("sci_truth_places", "0.01249", "1.25e-2", None, True, "1.25e-2 is written to 4 places"),
]

YES_NO_AND_TEXT = [
    ("yn_period", "Yes.", "yes", None, True, "trailing period"),
    ("yn_sentence", "yes, it is", "Yes", None, True, "yes/no by the first word"),
    ("yn_no_sentence", "No, the lines are not parallel.", "no", None, True, "yes/no by the first word"),
    ("yn_bold", "**Yes**", "yes", None, True, "markdown bold"),
    ("yn_opposite", "no", "yes", None, False, "opposite answer"),
    ("yn_opposite_sentence", "Yes, they are parallel.", "no", None, False, "opposite first word"),
    ("yn_not", "Not sure", "no", None, False, "'not' is not 'no'"),
    ("ff_article_case", "The Eiffel Tower", "eiffel tower", None, True, "articles and case"),
    ("ff_quotes", '"Red"', "red", None, True, "quotes"),
    ("ff_whitespace_period", "  Paris.  ", "paris", None, True, "whitespace and period"),
    ("ff_text_wrapper", "\\boxed{\\text{circle}}", "circle", None, True, "\\boxed{\\text{}}"),
    ("ff_superset_pred", "red and blue", "red", None, False, "exact strings: more is not equal"),
    ("ff_subset_pred", "red", "red and blue", None, False, "exact strings: less is not equal"),
    ("ff_different", "blue", "red", None, False, "different words"),
    ("ff_empty_pred", "", "red", None, False, "empty never matches"),
]

FINAL_ANSWER = [  # sampled responses as they come: tags left open, chatter, no tags at all
    ("fa_unclosed_then_new", "<answer>A</think><answer>B", "B", Q_BARS, True, "the last <answer> opening decides"),
    ("fa_unclosed_then_new_neg", "<answer>A</think><answer>B", "A", Q_BARS, False, "the first opening is replaced"),
    ("fa_unclosed_cut", "<answer>12</think>\nhmm, 13?", "12", None, True, "tag text ends at the next tag"),
    ("fa_last_line", "The bars are 3, 5 and 7.\nSo the tallest is\n7", "7", None, True, "no tags: the last line"),
    ("fa_phrase_then_chatter", "The answer is 8.\nLet me know if you need more.", "8", None, True,
     "the last phrase beats a later chatter line"),
    ("fa_this_answer_chatter", "The answer is 12.\nI hope this answer is helpful.", "12", None, True,
     "'this answer is' is not an answer phrase"),
    ("fa_after_think", "<think>Count them: 4 and 5.</think> 9", "9", None, True, "the reply after </think>"),
    ("fa_should_be", "Therefore the answer should be 42 cm.", "42", None, True, "'should be' phrase, units"),
    ("fa_earlier_number", "There are 3 rows of 4.\nThe answer is 12.", "3", None, False,
     "an earlier number is not the answer"),
]

MATCH_CASES = MC + NUMBERS + YES_NO_AND_TEXT + FINAL_ANSWER


@pytest.mark.parametrize("response,truth,question,expected,rule", [c[1:] for c in MATCH_CASES],
                         ids=[c[0] for c in MATCH_CASES])
def test_match_table(response, truth, question, expected, rule):
    assert answers_match(extract_answer(response), truth, question) is expected, rule


@pytest.mark.parametrize("question,expected", [
    (Q_BARS, {"a": "2019", "b": "2020", "c": "2021", "d": "2022"}),
    (Q_ANGLE, {"a": "30°", "b": "50°", "c": "60°", "d": "70°"}),
    (Q_RECT, {"a": "12 cm", "b": "15 cm", "c": "18 cm", "d": "24 cm"}),
    (Q_APPLES, {"a": "12", "b": "15", "c": "18", "d": "21"}),
    ("What is the length of side BC. Use point C. as given.", {}),
], ids=["lines", "choices_colon", "paren_lines", "inline", "no_options"])
def test_parse_options(question, expected):
    assert parse_options(question) == expected


def test_normalize_answer():
    assert normalize_answer('  "($\\text{Red}$)".  ') == "red"
    assert normalize_answer("The  Red   Square") == "red square"
    assert normalize_answer("A") == "a"  # a lone choice letter is not an article
