#!/usr/bin/env bash
# The voice call's prompts, spoken by espeak-ng and made 8 kHz mono signed linear
# (.sln, Asterisk's native format) by sox. Both are Debian packages:
#   apt-get install espeak-ng sox
#
#   prompts.sh OUTDIR
#
# writes OUTDIR/<locale>/otp/code-is.sln ("your code is") for every locale below,
# and OUTDIR/<locale>/digits/0.sln ... 9.sln for the locales whose digits Asterisk's
# own sound packages do not have. Copy OUTDIR's contents into Asterisk's sounds
# directory (Debian: /usr/share/asterisk/sounds/); the dev PBX gets them from
# `make pbx-up`. SayDigits picks digits/N from the channel's language, which the
# gateway sets on each voice call (CHANNEL(language)).
#
# Adding a locale is a line in LOCALES (and the locale in the gateway's
# voice.locales): its espeak-ng voice (`espeak-ng --voices`), "your code is" in its
# language, and its words for 0-9, or "-" where Asterisk's own prompts say them.
set -euo pipefail

LOCALES=(
    "en|en-us|Your code is|-"
    "id|id|Kode Anda adalah|nol satu dua tiga empat lima enam tujuh delapan sembilan"
)

out=${1:?usage: prompts.sh OUTDIR}
for tool in espeak-ng sox; do
    command -v "$tool" >/dev/null || { echo "prompts: $tool is missing: apt-get install espeak-ng sox" >&2; exit 1; }
done

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# speak VOICE TEXT FILE: TEXT as 8 kHz mono 16-bit signed linear in FILE, the
# silence espeak-ng leaves before and after the words cut off, and 50 ms of
# silence kept at the end so that digits said one after another stay apart.
speak() {
    espeak-ng -v "$1" -s 150 -w "$tmp/say.wav" "$2"
    sox "$tmp/say.wav" -t raw -r 8000 -c 1 -b 16 -e signed-integer "$3" \
        silence 1 0.01 0.5% reverse silence 1 0.01 0.5% reverse pad 0 0.05
}

for entry in "${LOCALES[@]}"; do
    IFS='|' read -r locale voice intro digits <<<"$entry"
    mkdir -p "$out/$locale/otp"
    speak "$voice" "$intro" "$out/$locale/otp/code-is.sln"
    if [ "$digits" != "-" ]; then
        mkdir -p "$out/$locale/digits"
        read -r -a words <<<"$digits"
        [ "${#words[@]}" -eq 10 ] || { echo "prompts: $locale needs ten words for 0-9" >&2; exit 1; }
        for n in "${!words[@]}"; do
            speak "$voice" "${words[$n]}" "$out/$locale/digits/$n.sln"
        done
    fi
done
echo "prompts: ${#LOCALES[@]} locales in $out"
