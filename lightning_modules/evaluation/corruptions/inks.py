"""The ink-stain masks of MedMNIST-C's stain deposit (``assets/inks.npz`` of medmnistc 0.1.0,
Di Salvo et al. 2024, Apache-2.0): 10 binary masks per size, bit-packed (``np.packbits``)
and base64-encoded. Only the sizes its evaluation uses are kept: 24 px (severities 1-4) and
32 px (severity 5), both at the 224 px reference side."""

from __future__ import annotations

import base64

import numpy as np

__all__ = ["inks"]

_PACKED = {
    24: (
        "AP4AA/8AA//AB//gH//gH//gH//4f//4f//wf//4P//4H//wH//gD//wD//wD//wD//wB//gB//gAGPgAAPgAAGA"
        "AAAAAAAAAAAAD/AAD/4AD/4AD/8AH/84H//8H///P///f///////////f///P///P//+H//8D//8D//4D//wA/7g"
        "A/wAAfgAAPAAAAAAAAAAAHAAAAAAAP8AGf8GP//mH//+///+f///f//////////////////////8H//+H//8f//4"
        "A//wAM/wAAfwAADwAADAAAAAAA8AAH/gA//wB//wD//gf//8///+////////////////////////////////////"
        "///+f//8P//8P//4H//4A//wAf+AAHgAA/QAB/+AB//gD//wH//wH//4P//8f//8f//+f//+////////////////"
        "P//+P//+H//8D//8D//8D//8B//wA//gAf/gAf/AAA+AAD/AAD/wAD/wD//wH//wP//8f//4///4///8///8///w"
        "///wP//wf//wP//wH//wD//wD//wD//gB//AAAAAAAAAAAAAAf+AA//AE//wP//4P//8f//+///8///+///+f//+"
        "f//+f//+P//+f//+P//+P//+H//8H//4D//gD//wD//wB//AA/8AAHwAAAAAAAAAADAAAHuAAf+AA//gA//gA//g"
        "A//gP//g///A///A///A///A///gf//gD//gB//wH//gOH+APHcACHMAABwAABwAAA+AAA/AACfAAP8AAP/AAP/A"
        "B//AD//8D//8D//4H//wH//0D//+P//+P//4H//4H//4H//wH//wH//wH/vAA/PAAMAAAAAAAHgAAHwAAH8AA/+A"
        "A//AA//AH//gP//gP//gP//8P//+P///H///H///H///H///D///D//+D//+B//wB/fwA8OAAAAAAAAA"
    ),
    32: (
        "AAAAAAAAAAAH5kAAB+4AAA//8AAP//wAH///AD///wB///4Af//+AD///wA////gH///8B////AH///wB///4D//"
        "/+A////+P////z////8/////P////x///zwf//uYD//7AAC8+AAAPHgAABx4AAAcAAAAAAAAAAAAAAAAAAAAAAAA"
        "AAAAAADwAAAB/gAAA/8AAAP/wAAP//gAf///gH///4B////A////wP///9j////8/////P////7////+f////n//"
        "//x////4f///+H////g////8H////Af//3wD//94AD//wAA//8AAP//AAB//wAAP+YAAB/gAAAAAAAAAAAAAADgA"
        "AAH5YAAH//AAP/+wAH//0AB//9AD///gf///8H///+B////gP///8B////7P//+X3///gN////j////8/////P//"
        "//3////g////wH///4B/7/+ABu//kAX//wADvecAAzYEAAAQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
        "AB4AAAA/OcAA//3gAP//8AD///AB///wA///8Af///AP///wD///8B////A////wP///8P////j////gf///4H//"
        "/8A///8AP///AB///4AH///AAP//wAD//+AB///gAd//wAD//4AAf/+AAA//gAAM/oAAAAAAAAAAAAAAcGAAAf/w"
        "AAf/8AA///gAf//gAH//4AP///B////4f///4D////A////+D///3w///8D////5/////P////7/////////+P//"
        "/+B////Af///wB///8AH//+ABv//gAP/NgAAH4AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAIAgAAHgAAAH/gAAB/8AA"
        "A//6AAP//wAD///AA///4AP//+AD///gP///wD///8Bv///AD///wH////B////w////4D///+A////oP////H//"
        "//h////4f///+D/7/+C/8f4AH/D+AA/gAAAJgCAAAAAAAAAAAAAAAAAAAA4AAAA/AAAAP8AAAD/4AAA/+gAB//4A"
        "Af/+AAH//gAD//4AD///AD///wA///+4P////D////4////+P////z////8P////D////w////8P////D////gf/"
        "//4H///8A///4AP//+AD///gAf+eAAH+HgAAeAAAAAAAAAAAAAAAA+cAAAP/AAAH/4ADx/+AB8f/gAf3/4Af//8A"
        "H///4B///+Af///gD///wB///9Af///wD///4B///+A////gPf//wDf//+AB//9gAf/+QAfv/gAH7/4AB9//AAKf"
        "/gAAP/4AAH/YAAAjgAAAB+AAAAfgAAAP4AAAAfAAAAHgAAAAAAAAAAAAAAAAAAAAAAAAB/AAAA/4AAAf+YAAP/+A"
        "/7//wP///4D////g////8P////D////A3///wP///8Af///AH///gA///wDv//4A5//+AOf//ABn//wAAf/+AAD/"
        "+AAD3/wAAc/8AAAH2AAA9wAAAPcAAABgAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAABkAAAA/wfAAP//4AL//8A"
        "H///gB///8Af///wD///8A///+Af///IP///zz///54f///8H///8B///3AP//8AD///AAP//wAAP/4AAD/8AAA/"
        "+OAAPfPAAD+DwAAP84AAH/AAAB/AAAAPAAA="
    ),
}


def inks(side: int) -> np.ndarray:
    """The 10 ``(side, side)`` masks of one size as a uint8 array (1 = ink)."""
    bits = np.unpackbits(np.frombuffer(base64.b64decode(_PACKED[side]), np.uint8))
    return bits[: 10 * side * side].reshape(10, side, side)
