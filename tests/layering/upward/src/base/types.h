// Fixture for the layering check: an include inside the layer is fine.
#pragma once
