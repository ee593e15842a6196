/*
 * The embedded cubins (generated rqMoeCubins.h): the only translation unit that includes them, so the bytes
 * exist once in the library and editing the launcher does not recompile them.
 */
#include "rqMoeCubins.h"
