"""Answer extraction and matching of difficulty.py (also used by infer.py for evaluation).

    python -m pytest -q test_difficulty.py
"""
import pytest

from difficulty import answers_match, extract_answer, normalize_answer, parse_options

# ----------------------------------------------------------------------------------------------------
# extract_answer

EXTRACT_CASES = [
    ("tag", "<think>The tallest bar is 2020.</think><answer>B</answer>", "B"),
    ("last_tag_wins", "<answer>A</answer> wait, recheck... <answer>12</answer>", "12"),
    ("truncated_tag", "Counting the apples.\n<answer> 42 cm", "42 cm"),
    ("tag_multiline", "<answer>\nB\n</answer>", "B"),
    ("phrase_inside_tag", "<answer>The answer is C.</answer>", "C"),
    ("boxed_inside_tag", "<answer>so \\boxed{7}</answer>", "7"),
    ("boxed_nested", "Thus the ratio is \\boxed{\\frac{3}{4}}.", "\\frac{3}{4}"),
    ("boxed_nested_deep", "We get \\boxed{a^{2}+b^{2}} as claimed.", "a^{2}+b^{2}"),
    ("last_boxed_wins", "First \\boxed{5}, corrected: \\boxed{6}", "6"),
    ("boxed_text", "\\boxed{\\text{Paris}}.", "Paris"),
    ("boxed_over_phrase", "The answer is 5? No: \\boxed{6}", "6"),
    ("answer_is", "The triangle is isosceles, so the answer is 12.", "12"),
    ("answer_is_decimal_kept", "The answer is 3.14 meters. Done.", "3.14 meters"),
    ("last_answer_is_wins", "I think the answer is B. Checking again, the answer is C.", "C"),
    ("final_answer_colon", "Step 1: ...\nFinal Answer: (B)", "(B)"),
    ("markdown_bold", "Reasoning...\n**Final Answer:** 3.5 cm", "3.5 cm"),
    ("answer_on_next_line", "The answer is\n15", "15"),
    ("dollar_wrapped", "The answer is $\\frac{1}{2}$.", "\\frac{1}{2}"),
    ("currency_kept", "the answer is $3.50. That's the price", "$3.50"),
    ("text_wrapper", "$\\text{yes}$", "yes"),
    ("last_line", "Step 1: count rows.\nStep 2: multiply.\n\n15\n\n", "15"),
    ("empty", "", ""),
]


@pytest.mark.parametrize("response,expected", [c[1:] for c in EXTRACT_CASES],
                         ids=[c[0] for c in EXTRACT_CASES])
def test_extract_answer(response, expected):
    assert extract_answer(response) == expected


# ----------------------------------------------------------------------------------------------------
# answers_match(extract_answer(response), truth, question)

Q_BARS = ("Which year has the tallest bar?\nA. 2019\nB. 2020\nC. 2021\nD. 2022\n"
          "Answer with the option's letter from the given choices directly.")
Q_ANGLE = ("In the figure, angle ABC = 40°. What is angle ACB? "
           "Choices: A: 30°, B: 50°, C: 60°, D: 70°")
Q_RECT = "What is the perimeter of the rectangle?\n(A) 12 cm\n(B) 15 cm\n(C) 18 cm\n(D) 24 cm"
Q_APPLES = "How many apples are in the picture? A. 12 B. 15 C. 18 D. 21"
Q_YESNO = "Question: Is Navy Blue the minimum?\nChoices:\n(A) yes\n(B) no"

MATCH_CASES = [
    # multiple choice, letter vs letter
    ("mc_letter", "B", "B", Q_BARS, True),
    ("mc_paren", "(B)", "B", Q_BARS, True),
    ("mc_period", "B.", "B", Q_BARS, True),
    ("mc_letter_with_text", "B) 2020", "B", Q_BARS, True),
    ("mc_option_word", "Option B", "B", Q_BARS, True),
    ("mc_answer_is", "Looking at the bars, the answer is B.", "B", Q_BARS, True),
    ("mc_tag_lowercase", "<answer>b</answer>", "B", None, True),
    ("mc_wrong_letter", "C", "B", Q_BARS, False),
    ("mc_letter_wins_over_text", "A) 2020", "B", Q_BARS, False),
    ("mc_wrong_letter_no_question", "The answer is A", "B", None, False),
    # multiple choice, letter vs option text (needs the question)
    ("mc_text_pred_letter_truth", "2020", "B", Q_BARS, True),
    ("mc_wrong_text_pred", "2021", "B", Q_BARS, False),
    ("mc_letter_pred_text_truth", "C", "60°", Q_ANGLE, True),
    ("mc_wrong_letter_text_truth", "D", "60°", Q_ANGLE, False),
    ("mc_text_units_vs_letter", "60 degrees", "C", Q_ANGLE, True),
    ("mc_paren_options_letter", "(C) 18 cm", "C", Q_RECT, True),
    ("mc_paren_options_text", "18", "C", Q_RECT, True),
    ("mc_inline_options", "B", "15", Q_APPLES, True),
    ("mc_inline_wrong", "C", "15", Q_APPLES, False),
    ("mc_letter_without_options", "B", "15", None, False),
    ("mc_yes_option", "A", "yes", Q_YESNO, True),
    ("mc_no_text_vs_letter", "no", "B", Q_YESNO, True),
    # numbers
    ("num_thousands_pred", "1,234", "1234", None, True),
    ("num_thousands_truth", "There are 1234 people.\nThe answer is 1234", "1,234", None, True),
    ("num_units", "12 cm", "12", None, True),
    ("num_square_units", "The area is 24 cm^2, so the answer is 24 cm^2.", "24", None, True),
    ("num_degrees_latex", "\\boxed{45^\\circ}", "45", None, True),
    ("num_degrees_words", "45 degrees", "45°", None, True),
    ("num_currency", "$3.50", "3.5", None, True),
    ("num_percent_face", "30%", "30", None, True),
    ("num_percent_fraction", "30%", "0.3", None, True),
    ("num_percent_truth", "0.3", "30\\%", None, True),
    ("num_fraction_vs_decimal", "3/4", "0.75", None, True),
    ("num_latex_frac", "\\boxed{\\frac{3}{4}}", "0.75", None, True),
    ("num_decimal_vs_fraction", "0.75", "3/4", None, True),
    ("num_rel_tol", "3.1416", "3.14", None, True),
    ("num_rounds_to_truth", "3.14159", "3.1", None, True),
    ("num_third", "1/3", "0.33", None, True),
    ("num_int_float", "12.0", "12", None, True),
    ("num_variable_prefix", "x = 5", "5", None, True),
    ("num_unicode_minus", "−3", "-3", None, True),
    ("num_off_by_one", "13", "12", None, False),
    ("num_extra_digit", "120", "12", None, False),
    ("num_int_exact", "12.5", "12", None, False),
    ("num_outside_tol", "3.2", "3.14", None, False),
    ("num_no_percent_no_scale", "30", "0.3", None, False),
    ("num_two_numbers", "12 or 13", "12", None, False),
    ("num_decimal_not_thousands", "1,234", "1.234", None, False),
    ("num_negative", "-5", "5", None, False),
    # yes / no
    ("yn_period", "Yes.", "yes", None, True),
    ("yn_sentence", "yes, it is", "Yes", None, True),
    ("yn_no_sentence", "No, the lines are not parallel.", "no", None, True),
    ("yn_bold", "**Yes**", "yes", None, True),
    ("yn_opposite", "no", "yes", None, False),
    ("yn_opposite_sentence", "Yes, they are parallel.", "no", None, False),
    ("yn_not", "Not sure", "no", None, False),
    # free-form short answers
    ("ff_article_case", "The Eiffel Tower", "eiffel tower", None, True),
    ("ff_quotes", '"Red"', "red", None, True),
    ("ff_whitespace_period", "  Paris.  ", "paris", None, True),
    ("ff_text_wrapper", "\\boxed{\\text{circle}}", "circle", None, True),
    ("ff_superset_pred", "red and blue", "red", None, False),
    ("ff_subset_pred", "red", "red and blue", None, False),
    ("ff_different", "blue", "red", None, False),
    ("ff_empty_pred", "", "red", None, False),
]


@pytest.mark.parametrize("response,truth,question,expected", [c[1:] for c in MATCH_CASES],
                         ids=[c[0] for c in MATCH_CASES])
def test_match_table(response, truth, question, expected):
    assert answers_match(extract_answer(response), truth, question) is expected


def test_match_table_has_enough_negatives():
    assert len(MATCH_CASES) >= 40 and sum(not c[-1] for c in MATCH_CASES) >= 12


@pytest.mark.parametrize("question,expected", [
    (Q_BARS, {"a": "2019", "b": "2020", "c": "2021", "d": "2022"}),
    (Q_ANGLE, {"a": "30°", "b": "50°", "c": "60°", "d": "70°"}),
    (Q_RECT, {"a": "12 cm", "b": "15 cm", "c": "18 cm", "d": "24 cm"}),
    (Q_APPLES, {"a": "12", "b": "15", "c": "18", "d": "21"}),
    ("What is the length of side BC. Use point C. as given.", {}),
], ids=["lines", "choices_colon", "paren_lines", "inline", "no_options"])
def test_match_parse_options(question, expected):
    assert parse_options(question) == expected


def test_match_normalize_answer():
    assert normalize_answer('  "($\\text{Red}$)".  ') == "red"
    assert normalize_answer("The  Red   Square") == "red square"
    assert normalize_answer("A") == "a"  # a lone choice letter is not an article
