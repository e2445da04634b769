"""The self-containment check used on every report: it finds each kind of reference a sandboxed iframe cannot
follow, and passes what lives inside the page."""

from helpers.html_check import in_sandboxed_iframe, outside_references

PIXEL = "data:image/png;base64," + (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)


def test_references_outside_the_page_are_found():
    page = (
        "<a href='images/0001.png'>x</a><img src='thumb.jpg'><link rel='stylesheet' href='s.css'>"
        "<script src='https://cdn.example/x.js'></script><div style=\"background:url(bg.png)\"></div>"
        "<style>body{background:url('b.png')}</style>"
    )
    found = outside_references(page)
    assert len(found) == 6, found


def test_what_lives_inside_the_page_passes():
    page = (
        "<a href='#metrics'>metrics</a><img src='data:image/png;base64,AAAA'>"
        "<style>td{padding:4px} i{background:url(data:image/png;base64,AAAA)}</style><table id='metrics'></table>"
    )
    assert outside_references(page) == []


def test_the_sandboxed_iframe_shows_inline_images_and_breaks_relative_ones(tmp_path):
    """The real browser agrees with the static check: what the check passes loads in KFP's viewer, what it flags
    does not."""
    good = f"<html><body><h1>report</h1><img src='{PIXEL}'><a href='#top'>top</a></body></html>"
    seen = in_sandboxed_iframe(good, tmp_path)
    assert seen["images"] == 1 and seen["broken"] == [] and seen["links"] == [] and seen["fetched"] == []
    bad = "<html><body><a href='images/0001.png'><img src='images/0001.png'></a></body></html>"
    seen = in_sandboxed_iframe(bad, tmp_path)
    assert seen["broken"] == ["images/0001.png"] and seen["links"] == ["images/0001.png"] and seen["fetched"]
