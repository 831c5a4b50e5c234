"""Kept for test modules written before the lab moved into the package."""

from cloudroutes.lab.netns import Netns, Underlay, link_veth, unique_name

__all__ = ["Netns", "Underlay", "link_veth", "unique_name"]
