// Raw memory rates of this machine with both threads: read-only, plain copy (read +
// write counted) and streaming-store copy, best of 30, on a buffer of N MB.
// Build and run (outside CI): gcc -O2 -mavx512f -fopenmp read_rates.c -o read_rates &&
//   OMP_NUM_THREADS=2 ./read_rates 51
// Quoted in bench/RESULTS.md ("Raw rates on this machine").
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <immintrin.h>
#include <omp.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
int main(int argc,char**argv){
  size_t mb=atoi(argv[1]); size_t n=mb*(1<<20)/4; float*a=aligned_alloc(64,n*4); float*b=aligned_alloc(64,n*4);
  #pragma omp parallel for
  for(size_t i=0;i<n;i++){a[i]=i;b[i]=0;}
  double best=1e9, bestc=1e9, bestnt=1e9; float s=0;
  for(int r=0;r<30;r++){
    double t=now();
    #pragma omp parallel reduction(+:s)
    { __m512 acc=_mm512_setzero_ps();
      #pragma omp for
      for(size_t i=0;i<n;i+=16) acc=_mm512_add_ps(acc,_mm512_load_ps(a+i));
      s+=_mm512_reduce_add_ps(acc);}
    t=now()-t; if(t<best)best=t;
    t=now();
    #pragma omp parallel for
    for(size_t i=0;i<n;i+=16) _mm512_store_ps(b+i,_mm512_load_ps(a+i));
    t=now()-t; if(t<bestc)bestc=t;
    t=now();
    #pragma omp parallel for
    for(size_t i=0;i<n;i+=16) _mm512_stream_ps(b+i,_mm512_load_ps(a+i));
    t=now()-t; if(t<bestnt)bestnt=t;
  }
  printf("%zu MB: read %.1f GB/s, copy %.1f GB/s (r+w), nt copy %.1f GB/s (%g)\n",mb,n*4.0/best/1e9,2*n*4.0/bestc/1e9,2*n*4.0/bestnt/1e9,s);
}
