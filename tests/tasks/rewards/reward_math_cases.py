"""(gold, prediction, expected) answer pairs for the math verifier.

Our own cases, grouped by the kinds of forms HF Math-Verify's tests check (docs/spec.md §6.1):
LaTeX fractions and their malformed variants, roots, styling commands, units, degrees,
percentages, thousands separators, decimals vs fractions, equations, intervals, tuples, sets,
answer lists, symbolic expressions, text answers, and wrong answers of each kind.
"""

MATH_CASES = [
    # plain numbers
    ("4", "4", True),
    ("4", "4.0", True),
    ("4", "5", False),
    ("-3", "-3", True),
    ("-3", "3", False),
    # fractions, decimals
    ("\\frac{1}{2}", "0.5", True),
    ("1/2", "\\frac{1}{2}", True),
    ("-10/9", "-\\frac{10}{9}", True),
    ("\\frac{1}{3}", "\\frac13", True),
    ("1", "\\frac3{3}", True),
    ("\\frac{1}{3}", "\\dfrac{1}{3}", True),
    ("\\frac{1}{3}", "\\tfrac{1}{3}", True),
    ("\\frac{1}{3}", "0.3333333", True),
    ("\\frac{1}{3}", "0.33", False),
    ("0.4", ".4", True),
    ("\\frac{2}{3}", "\\frac{3}{2}", False),
    # roots, pi, powers
    ("\\sqrt{3}", "\\sqrt3", True),
    ("3\\sqrt{13}", "\\sqrt{117}", True),
    ("2\\sqrt{2}", "\\sqrt{8}", True),
    ("\\sqrt[3]{8}", "2", True),
    ("2\\pi", "2 \\cdot \\pi", True),
    ("\\frac{\\pi}{2}", "\\pi/2", True),
    ("2^{10}", "1024", True),
    ("\\pi", "3.14", False),
    # styling and units
    ("\\frac{1}{3}", "\\left( \\frac{1}{3} \\right)", True),
    ("\\frac{1}{3}", "\\frac{1}{3} \\text{meters}", True),
    ("15", "15\\mbox{ cm}^2", True),
    ("10", "10 \\text{ cm}", True),
    ("90^\\circ", "90", True),
    ("90", "90^{\\circ}", True),
    ("\\$5", "5", True),
    ("5", "5.", True),
    # percentages
    ("28\\%", "28", True),
    ("28\\%", "28 percent", True),
    ("28\\%", "0.28", True),
    ("28\\%", "29\\%", False),
    # thousands separators
    ("1000", "1,000", True),
    ("14916", "14{,}916", True),
    ("1000.5", "1,000.5", True),
    ("1000000", "1,000,001", False),
    # equations
    ("3", "x = 3", True),
    ("\\frac{1}{3}", "k = \\frac{1}{3}", True),
    ("3", "x = 4", False),
    ("y = 2x + 3", "y = 3 + 2x", True),
    ("y = 2x + 3", "2x - y + 3 = 0", True),
    ("y = 2x + 3", "y = 2x - 3", False),
    # symbolic
    ("x^2 + 2x + 1", "(x+1)^2", True),
    ("2-2p", "-2p + 2", True),
    ("\\frac{x}{2}", "0.5x", True),
    ("x^2", "x^3", False),
    ("e^{2}", "e^2", True),
    # intervals, tuples, sets, lists
    ("[0,1)", "[0,1)", True),
    ("[0,9)", "[0,1)", False),
    ("(0,9)", "[0,9)", False),
    ("(-\\infty, 2]", "(-\\infty,2]", True),
    ("(1, 2) \\cup (3, 4)", "(1,2)\\cup(3,4)", True),
    ("x \\in [1, 2]", "[1, 2]", True),
    ("(3, \\frac{\\pi}{2})", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    ("(1, 2)", "(2, 1)", False),
    ("(1, 2)", "1", False),
    ("\\{1, 2, 3\\}", "\\{3, 2, 1\\}", True),
    ("\\{1, 2\\}", "\\{1, 3\\}", False),
    ("-2, 1", "1, -2", True),
    ("-2, 1", "-2", False),
    # text answers and letters
    ("\\text{Evelyn}", "Evelyn", True),
    ("\\text{Evelyn}", "\\text{Briana}", False),
    ("\\text{(C)}", "C", True),
    # malformed / empty
    ("4", "", False),
    ("4", "\\frac{1}{", False),
    ("4", "__import__('os').getcwd()", False),
]
